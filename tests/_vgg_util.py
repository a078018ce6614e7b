"""A small VGG16-shaped feature extractor with random weights, for tests on machines
without the VGG16 weights (never for training: its features mean nothing)."""

from __future__ import annotations

import keras

from ldct_node.lab.losses import _frozen_feature_model


def random_vgg_like_extractor(seed: int = 0, width: int = 8) -> keras.Model:
    """A small VGG16-shaped extractor with random weights, for tests.

    Four blocks like VGG16's first four (2, 2, 3, 3 convolutions of ``width``,
    ``2 width``, ``4 width``, ``8 width`` channels, ReLU, 2x max pooling between blocks),
    with the same layer names, so code written for :func:`load_vgg_extractor` works on a
    machine without the VGG16 weights. Its features mean nothing perceptually; never use
    it for training.

    Parameters
    ----------
    seed
        Seed of the weight initialisers; the same seed gives the same weights.
    width
        Channels of block 1.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    blocks = ((1, 2, width), (2, 2, 2 * width), (3, 3, 4 * width), (4, 3, 8 * width))
    image = keras.Input(shape=(None, None, 3), name="input_layer")
    x = image
    layer_seed = seed
    for block, n_conv, filters in blocks:
        if block > 1:
            x = keras.layers.MaxPooling2D(2, name=f"block{block - 1}_pool")(x)
        for conv in range(1, n_conv + 1):
            layer_seed += 1
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                activation="relu",
                kernel_initializer=keras.initializers.HeNormal(seed=layer_seed),
                # Small positive biases keep ReLUs alive on the centred inputs.
                bias_initializer=keras.initializers.RandomUniform(0.0, 0.1, seed=-layer_seed),
                name=f"block{block}_conv{conv}",
            )(x)
    base = keras.Model(image, x, name="random_vgg_like")
    return _frozen_feature_model(base, "random_vgg_like_features")
