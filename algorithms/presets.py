"""The named algorithms: presets of (gradient oracle, local optimizer, communication rule)."""

from algorithms.base import preset

preset("csgd", "plain", "sgd", "allreduce", "C-SGD: all-reduce of gradients, SGD with momentum")
preset("dsgd", "plain", "sgd", "gossip", "D-SGD: gossip over the topology (Lian et al. 2017)")
preset("dsgd-ac", "plain", "sgd", "gossip-ac", "DSGD-AC: gossip with gamma_t = (lr_t/lr_start)^p after --ac-start (Wang & Johansson)")
preset("sam", "sam", "sgd", "allreduce", "SAM: per-worker SAM gradients, all-reduced (Foret et al. 2021)")
preset("ad-sam", "adsam", "sgd", "allreduce", "AD-SAM: gradient at Gaussian-perturbed weights (Bisla et al. 2022)")
preset("lamb", "plain", "lamb", "allreduce", "LAMB: layer-wise adaptive large-batch optimizer (You et al. 2020)")
preset("d-lamb", "plain", "lamb", "gossip", "D-LAMB: local LAMB updates, D-SGD mixing")
