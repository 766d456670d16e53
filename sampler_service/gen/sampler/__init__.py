"""Generated gRPC and protobuf code (python -m sampler_service.protogen); never edited by hand."""
