"""`epd-serve bench`: a load generator for OpenAI-compatible chat endpoints with images.

One concept per module: `dataset` (synthetic multimodal requests), `client` (one streamed request and
its timings), `load` (open and closed loop arrivals), `metrics` (latency and SLO summaries), `target`
(an external server or topologies brought up in-process), `report` and `plots` (what a run leaves
behind), `options` (the command line) and `runner` (all of it, topology by topology). Importing this
package loads nothing heavy: no torch, and matplotlib only when plots are asked for.
"""
