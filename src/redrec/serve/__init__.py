"""Online serving: the history store (:mod:`redrec.serve.history`) and the recommendation service."""
