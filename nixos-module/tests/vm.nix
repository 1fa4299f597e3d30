# NixOS VM test: a controller node and an agent node on one virtual network. An operator
# (on the controller node) registers the agent's key, publishes a signed generation that
# names the agent's "next" specialisation, and the agent switches to it and reports
# success. Run with `nix build .#checks.x86_64-linux.vm -L` (needs KVM).
#
# The keys below are TEST-ONLY fixtures, generated once with `muster-controller init`, so
# that the agent's configuration (controllerPin, trustedOperatorKeys) is known at build
# time. Never use them anywhere else.
{ pkgs, self }:
let
  controllerKey = "muster-secret-key-v1 ed25519 97gL1qs3d2jY7KOCyrohR6KdkuZjWFhcQr7WlheqrVo=";
  controllerPin = "sha256:cb7dfeb88e4eba3de7cb15b33357d875e23c4100848773de717ec844fcb3fbcc";
  operatorKey = "muster-secret-key-v1 ed25519 KH5Oi4VwvWf2PbRa9SNtY2/6NMQbvM2CbTSuyK/DiZU=";
  operatorPub = "ed25519:8HWZaglW/cHXqy0ltPG1kz0rJOFBJvhMvP6IyshGJeY=";
in
pkgs.testers.runNixOSTest {
  name = "muster-deploy";

  nodes.controller = { ... }: {
    imports = [ self.nixosModules.controller ];
    services.muster-controller = {
      enable = true;
      listen = [ "[::]:7443" ];
      openFirewall = true;
      settings.logLevel = "debug";
    };
    # Preseed the fixture key before the unit's own `muster-controller init` runs.
    systemd.services.muster-controller-preseed = {
      wantedBy = [ "muster-controller.service" ];
      before = [ "muster-controller.service" ];
      serviceConfig.Type = "oneshot";
      script = ''
        if [ ! -e /var/lib/muster-controller/controller.key ]; then
          install -d -m 0700 -o muster -g muster /var/lib/muster-controller
          install -m 0600 -o muster -g muster ${pkgs.writeText "controller.key" controllerKey} \
            /var/lib/muster-controller/controller.key
        fi
      '';
    };
    environment.etc."muster-test/operator.key" = {
      text = operatorKey;
      mode = "0600";
    };
  };

  nodes.agent = { lib, ... }: {
    imports = [ self.nixosModules.agent ];
    services.muster-agent = {
      enable = true;
      machine = "agent";
      controllers = [ "wss://controller:7443" ];
      inherit controllerPin;
      trustedOperatorKeys = [ operatorPub ];
      confirmTimeout = 60;
      healthChecks = [
        { name = "agent-unit"; command = [ "/run/current-system/sw/bin/systemctl" "is-active" "muster-agent" ]; timeout = 10; }
      ];
      settings.logLevel = "debug";
    };
    # The generation the operator publishes: the same system plus a marker file. Being a
    # specialisation, its closure is already in the VM's store, so realising needs no cache.
    specialisation.next.configuration = {
      environment.etc."muster-test-generation".text = "next\n";
    };
    virtualisation.memorySize = 1024;
  };

  testScript = { nodes, ... }:
    let
      next = "${nodes.agent.system.build.toplevel}/specialisation/next";
    in
    ''
      import json

      start_all()
      controller.wait_for_unit("muster-controller.service")
      controller.wait_for_open_port(7443)
      controller.succeed(
          "runuser -u muster -- muster-controller operator add alice "
          "--key ${operatorPub} --state-dir /var/lib/muster-controller"
      )
      controller.succeed("systemctl restart muster-controller.service")
      controller.wait_for_open_port(7443)

      agent.wait_for_unit("muster-agent.service")
      agent.succeed("muster-agent --check-config --config /etc/muster/agent.json")
      agent_key = agent.succeed("muster-agent --print-key --config /etc/muster/agent.json").strip()

      # The operator CLI reads the controller, its pin and the operator key from the
      # environment (MUSTER_CONTROLLER, MUSTER_PIN, MUSTER_KEY).
      cli = (
          "MUSTER_CONTROLLER=wss://controller:7443 "
          "MUSTER_PIN=${controllerPin} "
          "MUSTER_KEY=/etc/muster-test/operator.key muster"
      )
      controller.succeed(f"{cli} machine add agent --key {agent_key}")

      def machine(name):
          return json.loads(controller.succeed(f"{cli} --json status {name}"))[0]

      def online(_):
          return machine("agent")["online"]

      retry(online, timeout_seconds=180)

      # `next` is a specialisation's toplevel link; publish the store path it names.
      toplevel = agent.succeed("readlink -f ${next}").strip()
      controller.succeed(f"{cli} publish agent {toplevel} --action switch --wait --timeout 600")

      agent.succeed(f"test \"$(readlink -f /run/current-system)\" = {toplevel}")
      agent.succeed(f"test \"$(readlink -f /nix/var/nix/profiles/system)\" = {toplevel}")
      agent.succeed("grep -qx next /etc/muster-test-generation")
      assert machine("agent")["phase"] == "succeeded", machine("agent")
      agent.succeed("systemctl is-active muster-agent.service")
    '';
}
