// A SuccessFactors-like OData service: /odata/v2/sf/User, as the V2 adapter serves it.
namespace interop;

entity Users {
  key userId    : String(20);
      firstName : String(40);
      lastName  : String(40);
      email     : String(100);
}

@path: 'sf'
service SFService {
  entity User as projection on interop.Users;
}
