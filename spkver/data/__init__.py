"""Data: VoxCeleb preparation, the synthetic speaker corpus, augmentation."""
