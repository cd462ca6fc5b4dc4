"""Transports of DSD Serve (HTTP through BentoML, gRPC) around the model package's engine."""
