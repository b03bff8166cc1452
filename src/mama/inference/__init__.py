"""Using trained models: embed videos and texts, build an index, search it (:mod:`mama.inference.embed`)."""
