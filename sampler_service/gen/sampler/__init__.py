"""Generated gRPC and protobuf code (make protos: tools/protogen.py); never edited by hand."""
