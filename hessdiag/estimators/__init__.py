"""Estimators over the Hessian operator: both ends of the spectrum, its trace and density, where the curvature lives, the curvature along the gradient, and the update's quadratic model."""
