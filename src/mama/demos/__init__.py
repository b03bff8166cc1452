"""`mama demo`: side-by-side comparisons of the method's variants on SynthVL (retrieval and video QA)."""
