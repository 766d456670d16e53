"""The gRPC sampling service (`sampler-service serve`) and its client (`sampler-client`); sits on top of
solvers/ and models/ and is imported by neither. The contract is protos/sampler/v1/sampler.proto.

Importing the package imports nothing: the client (client.py, arguments.py, gen/) needs only grpc and
protobuf, never torch or the models; the server side (server.py, engine.py, jobs.py) brings those in.
"""
