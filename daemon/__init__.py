"""The long-running inference daemon: bundle loader, backends, scheduler and gRPC server."""
