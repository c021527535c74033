// FerryMigration: the seeder, leecher and hub roles on top of FerrySystem
// (the memory engine) and FerryWire (the encrypted RPC). FerryToolkit comes
// along, so the commands convert durations and start threads the same way.
@_exported import FerrySystem
@_exported import FerryToolkit
@_exported import FerryWire

/// The version printed by every command.
public let ferryVersion = "0.1.0"
