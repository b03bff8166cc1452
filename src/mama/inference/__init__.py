"""Using trained models: embed videos and texts, build an index, search it (:mod:`mama.inference.embed`),
over a FAISS vector index (:mod:`mama.inference.vector_index`)."""
