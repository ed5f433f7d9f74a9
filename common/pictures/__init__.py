"""Pictures: decode and resize to the model's size, the pixel payload (`images`); CIE Lab in numpy
(`lab`) and TensorFlow (`lab_tf`)."""
