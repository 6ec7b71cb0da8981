"""The machine-learning core: the model and its body/head split (``model``), the contributor's training
recipe (``recipe``, shared with the multitask baseline), the linear probe (``probe``) and the two
evaluation views (``views``). Pure of Flower: the ClientApp calls it."""

import transformers

transformers.utils.logging.disable_progress_bar()
