"""The hook engine, built on diffusers' ModelHook/HookRegistry."""
