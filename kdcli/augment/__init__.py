"""HARD's learned augmentations (``--augment hard``): the transforms (:mod:`.ops`) and the augmentor that
learns them (:mod:`.hard`). Above the methods (the augmentor optimises the wrapped method's loss), below the
engine (which attaches it and augments each training batch, :mod:`kdcli.engine.augment`)."""
