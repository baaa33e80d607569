"""Looking inside the latents: probe, interventions, ablations, the explorer."""
