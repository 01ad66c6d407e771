"""Dataset builder: four-class safety records become /think SFT records in the Phi-3.5 chat template."""
