# The vars generator scripts of muster's clan service, without clan-core or nixpkgs:
# the service module is applied to a two-function lib shim and the perInstance modules
# to stub arguments, which is all it takes to reach the generators (evaluated lazily).
# check.sh runs the scripts for real and compares their pin with the controller's.
{ muster }:
let
  lib = {
    optionalAttrs = c: a: if c then a else { };
    optionalString = c: s: if c then s else "";
  };
  service = (import (muster + "/nixos-module/clan-service.nix") { self = { }; }) {
    inherit lib;
    clanLib = { };
    directory = "/nonexistent";
  };
  pkgs.coreutils = "coreutils";
  config.services = {
    muster-controller.package = "muster";
    muster-agent.package = "muster";
  };
  generators = role: args:
    ((service.roles.${role}.perInstance args).nixosModule { inherit config pkgs; }).clan.core.vars.generators;
  ctl = (generators "controller" { settings = { }; }).muster-controller;
  # The agent's module is an import list; its generator comes from keyGenerator too.
  agentModule = builtins.elemAt ((service.roles.agent.perInstance {
    settings = { }; roles = { }; machine.name = "web1";
  }).nixosModule { }).imports 1;
  agent = ((agentModule { inherit config pkgs; }).clan.core.vars.generators).muster-agent;
  files = g: builtins.mapAttrs (_: f: {
    secret = f.secret or true;
    owner = f.owner or "root";
  }) g.files;
in
{
  controller = { script = ctl.script; files = files ctl; };
  agent = { script = agent.script; files = files agent; };
}
