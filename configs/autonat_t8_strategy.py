"""AutoNAT-L searched decoding strategy, T = 8 (docs/reference.md#decoding); reproduces the paper's FID."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.schedule = "autonat"  # 'autonat' (the lists below) or 'maskgit' (cosine; steps/cfg_scale/temp)
    c.ratios = [0.9531645174140464, 0.8795409806037042, 0.7940230737075623, 0.745995860948045,
                0.6249785820461957, 0.407321956652571, 0.260658917067054]
    c.conf_temps = [2.404912789740805, 2.477616274962803, 1.191696577294597, 0.7685444738649722,
                    1.0673489052089495, 0.9353720330515827, 0.7843839537838292]
    c.sample_temps = [2.8999037830310685, 1.867261830931786, 1.1443729673819831, 1.3796334226014182,
                      1.4699896959810144, 1.3760684112198358, 1.7082165405200722, 0.7133060703601533]
    c.guidance = [0.0001, 0.0001, 0.0001, 0.9151274967591447, 1.6160182878189675, 1.1945509026838659,
                  1.38322370140345, 1.22678520936251]
    # decoded [0,1] images -> uint8: 'truncate' = (x * 255).to(uint8), as the paper's scripts (its FID is computed
    # on truncated images); 'round' rounds to the nearest level
    c.pixels = "truncate"
    # used only when schedule == 'maskgit'
    c.steps = 8
    c.cfg_scale = 3.0
    c.temp = 4.5
    c.guidance_schedule = "linear"  # guidance per step: 'constant', 'linear' (0 -> cfg_scale) or 'pow-cosine'
    c.guidance_power = 1.0          # pow-cosine: cfg_scale * (1 - cos(pi * (t/(T-1))**power)) / 2
    # both schedules
    c.guidance_steps = "all"        # steps where guidance applies ('all', or indices/ranges '4-7'); 0 elsewhere
    c.order = "confidence"          # re-mask the least confident tokens, or 'halton': a fixed grid order
    return c
