"""The gRPC sampling service (arrives with its own issue); sits on top of solvers/ and models/."""

import time

# When the package was first imported: with `sampler-service serve` that is the start of the
# process but for the interpreter's own start-up, so time to SERVING counts torch's imports.
IMPORTED_AT = time.perf_counter()
