"""API layer: servicers, interceptors (wire), auth, the error->status map and the tracing wrappers.
Translation between protobuf and the domain only: no routing, scoring or statistics here."""
