"""The error of a run's settings and inputs.

Raised by the recipe (:mod:`megatron_normistral.config.recipe`: parsing, validation) and by the
checks of the inputs the recipe names (:mod:`.preflight`, :mod:`.data_setup`). It lives here,
below the recipe, so that training code can raise it without importing ``config/``.
"""


class RecipeError(ValueError):
    """A setting or input of the run is wrong; the message is one line naming the file, flag or
    field and what to do. ``pretrain_normistral.py`` prints it and exits with code 2."""
