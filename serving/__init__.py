"""Ray Serve application for cxrfm (multi-tenant serving; see the serving issue)."""
