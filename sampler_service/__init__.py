"""The gRPC sampling service (`sampler-service serve`) and its client (`sampler-client`); sits on top of
solvers/ and models/ and is imported by neither. The contract is protos/sampler/v1/sampler.proto.

Importing the package imports nothing but `time` (for IMPORTED_AT): the client (client.py,
arguments.py, gen/) needs only grpc and protobuf, never torch or the models; the server side
(server.py, engine.py, jobs.py) brings those in.
"""

import time

# When the package was first imported: with `sampler-service serve` that is the start of the
# process but for the interpreter's own start-up, so time to SERVING counts torch's imports.
IMPORTED_AT = time.perf_counter()
