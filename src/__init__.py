"""Library behind the stage scripts: data, backbones, anonymizers, probing, metrics and io."""
