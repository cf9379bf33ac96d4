"""CRIU glue: running CRIU, its action-script hook, its images and its page
server. (Kept empty: `hybridmig.criu.hook` starts while the tree is frozen.)"""
