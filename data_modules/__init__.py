"""Readers, splits and LightningDataModules for users' files."""
