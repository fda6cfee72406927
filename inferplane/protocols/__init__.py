"""Wire protocols: V2 (Open Inference Protocol) REST and gRPC, V1/TF-Serving REST."""
