"""The built-in conv families, one file each: what dynconv knows about a method beyond its layer (where its
layers go on each backbone, its named variants, schedules, official checkpoint layout, static initialisation).
Importing this package registers them, in the order of the papers' tables."""
from . import static, attention, condconv, dyconv, dcd, odconv, kernelwarehouse, dgc, icconv, fdconv  # noqa: F401
