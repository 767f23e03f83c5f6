"""system: the operating system as the engine uses it: private work directories and their cleanup
on every exit, O_DIRECT tensor files with checksums, memory and disk limits (cgroups included).
May import: core."""
