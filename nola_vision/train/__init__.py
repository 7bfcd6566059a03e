"""Training: the recipe and schedule, ``FewShotClassifier`` (a LightningModule) and the Lightning CLI.

Import ``nola_vision.train.module`` or ``nola_vision.train.cli`` for the Lightning pieces; this face stays light.
"""
