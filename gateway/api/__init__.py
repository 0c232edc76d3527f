"""API layer: servicers, interceptors (wire), auth and the error->status map. Translation between
protobuf and the domain only: no routing, scoring or statistics here."""
