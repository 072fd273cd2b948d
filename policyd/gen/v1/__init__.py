"""Generated gRPC/protobuf code. Regenerate with `make proto`."""
