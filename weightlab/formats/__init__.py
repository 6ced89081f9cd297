"""On-disk layouts, one per module: each turns a layout's keys into weightlab's normalised (diffusers) names."""
