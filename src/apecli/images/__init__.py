"""Reading images for the encoder: EXIF orientation (:mod:`~apecli.images.exif`), PIL decoding in loader
workers, the faithful default (:mod:`~apecli.images.loading`), and batched JPEG decoding on the GPU
(:mod:`~apecli.images.gpu`)."""
