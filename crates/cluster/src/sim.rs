pub struct World;
