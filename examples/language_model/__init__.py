"""A small GPT-style causal language model, trained with the Hugging Face Trainer while
recorded, and the loss of held-out sequences explained exactly (see README.md).

    python -m examples.language_model --out runs/lm            # train, then analyse
    python -m examples.language_model --out runs/lm --small    # the seconds-long configuration
"""
