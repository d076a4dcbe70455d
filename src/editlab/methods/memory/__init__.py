"""Memory methods: the edited system keeps the model's weights and answers through an external memory
of edited facts (retrieval on sentence embeddings, `retriever.py`) or through its prompts (IKE's
demonstrations, `ike.py`). Each returns an LM view (`models/view.py`), so metrics score it like any edit."""
