"""The torch.library ops (namespace ``mnet_ext``); importing this package registers them."""

from mnet_ext.ops import dwconv_bn_act, squeeze_excite

__all__ = ["dwconv_bn_act", "squeeze_excite"]
