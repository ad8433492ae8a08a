"""tam_jax: few-shot video classification by temporal alignment (Cao et al., CVPR 2020).

Submodules are imported lazily so that `import tam_jax.alignment` needs only jax.
"""

__version__ = "0.1.0"
