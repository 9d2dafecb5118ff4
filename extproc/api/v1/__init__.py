"""Generated code of the project's own gRPC API (protos/extproc/api); `make protos` regenerates it."""
