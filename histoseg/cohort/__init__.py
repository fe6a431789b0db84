"""Cohort adaptation (``histoseg adapt-cohort``): one adversarial adaptation of a model to many unlabeled
slides, with the source training data beside it (discriminative patch representations, Tsai et al. ICCV 2019;
output-space alignment, AdaptSegNet, as the baseline).

Modules: ``settings`` (CohortSettings, no torch), ``modes`` (patch label histograms, seeded k-means, the K
table), ``heads`` (mode head, discriminators, generator/discriminator steps), ``data`` (the slides' target crops and
the labelled source set), ``train`` (the loop, checkpoints, the card).
"""
