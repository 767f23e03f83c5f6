"""kernels: the math the layers call, fast where the machine allows: linear (plain, oneDNN-packed,
4-bit), attention, group-wise quantization, the whole int4 layout, and the run-time probe that
chooses among them. May import: core."""
