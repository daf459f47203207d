"""normkit's lab: experiments that measure what normalization does, on data that ships offline.

Uses the public API as a user would. Needs the ``lab`` extra (scikit-learn, matplotlib).
"""
