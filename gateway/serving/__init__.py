"""Serving: one owner per prediction (Predictor) and the parts it drives: route by the split's router
(which caches its decisions), project features, micro-batch, call Ray Serve replicas, fail over, mirror
to a shadow."""
