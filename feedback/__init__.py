"""The data loop: prediction ids, and (to come) the prediction log, moderation and datasets.

Imports models/, never service/.
"""
