"""The math of structure rewrites (CReLU pairs, MixConv kernels, grouped convs, fire modules,
channel reordering): pure functions over weights and the channel analysis."""
