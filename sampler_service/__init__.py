"""The gRPC sampling service (arrives with its own issue); sits on top of solvers/ and models/."""
