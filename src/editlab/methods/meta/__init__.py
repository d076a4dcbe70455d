"""Meta-learned editors (MEND, MALMEN, KE): a network trained once per base model (`editlab train`,
`train/meta.py`) turns the gradient of an edit into a weight delta in one forward/backward pass. Shared:
`factors.py` (gradient factors, hooked edited forward), `nets.py` (factor network, running statistics),
`common.py` (losses and the `LearnedEditor` base), `hparams.py` (torch-free hyper-parameters)."""
