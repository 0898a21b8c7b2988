"""Sign-based optimizers, optax's own: Lion (arXiv 2302.06675), Signum and signSGD (Bernstein
et al., arXiv 1802.04434), with decoupled weight decay on the matrices.

Their updates have unit size per coordinate, so Lion's paper advises an lr 3-10x below AdamW's
and a weight decay 3-10x above it (the product lr·wd, the decay per step, stays put); Signum
and signSGD follow Lion.
"""

from __future__ import annotations

import optax

from jaxllm.optim.decay import with_decoupled_decay
from jaxllm.optim.registry import OptimizerOptions, register_optimizer


@register_optimizer("lion", OptimizerOptions, lr=1e-4, b2=0.99, weight_decay=0.3)
def _lion(learning_rate, options, *, b1, b2, weight_decay, mask):
    # optax.lion's default weight_decay is 1e-3, not 0: always pass ours.
    return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)


@register_optimizer("signum", OptimizerOptions, lr=1e-4, b2=None, weight_decay=0.3)
def _signum(learning_rate, options, *, b1, b2, weight_decay, mask):
    tx = optax.signum(learning_rate, beta=b1)
    return with_decoupled_decay(tx, learning_rate, weight_decay, mask)


@register_optimizer("sign_sgd", OptimizerOptions, lr=1e-4, b2=None, weight_decay=0.3)
def _sign_sgd(learning_rate, options, *, b1, b2, weight_decay, mask):
    return with_decoupled_decay(optax.sign_sgd(learning_rate), learning_rate, weight_decay, mask)
