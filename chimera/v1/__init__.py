"""Generated gRPC stubs of protos/chimera/v1 (`make proto`); the ground floor every package may import."""
